"""The helper side of `train.sandbox` (processes A, B, C, D of its docstring): builds the
sandbox and runs the program in it. Started by `train.sandbox.run_python` as a script,
`python -I -S _sandbox_helper.py CONFIG`, so it imports nothing but the standard library
and `_sandbox_abi.py` next to it (isolated mode puts neither this folder nor site-packages on
sys.path: the helper adds this folder for that one import).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

if __package__:  # imported as train._sandbox_helper (train.sandbox reads its constants)
    from train import _sandbox_abi as abi
else:  # run as a script, `python -I -S`: neither this folder nor site-packages is on sys.path
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    try:
        import _sandbox_abi as abi
    finally:
        del sys.path[0]

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
            libc = abi.Libc()
            libc.prctl(abi.PR_SET_PDEATHSIG, signal.SIGTERM)  # the evaluator died: clean up
            libc.prctl(abi.PR_SET_CHILD_SUBREAPER, 1)
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
    layers = {"user_ns": False} | {name: False for name, _ in abi.NAMESPACES}
    if libc is not None:
        libc.prctl(abi.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:
        os._exit(1)
    if use_userns:
        try:
            libc.unshare(abi.CLONE_NEWUSER)
            os.write(sync_w, b"U")
            if os.read(go_r, 1) != b"K":
                os._exit(RETRY_WITHOUT_USERNS)
            layers["user_ns"] = True
        except OSError as e:
            os.write(sync_w, f"N:{e}".encode())
    os.close(sync_w)
    os.close(go_r)
    for name, flag in abi.NAMESPACES:
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
        libc.prctl(abi.PR_SET_PDEATHSIG, signal.SIGKILL)
        libc.prctl(abi.PR_SET_DUMPABLE, 0)  # the program cannot ptrace or read /proc of its init
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
    libc.mount(src, dst, None, abi.MS_BIND | abi.MS_REC)
    targets = [dst]
    if S.S_ISDIR(st.st_mode):  # submounts too (they came along with abi.MS_REC)
        with open("/proc/self/mountinfo") as fh:
            for line in fh:
                mp = line.split()[4].encode().decode("unicode_escape")
                if mp.startswith(dst.rstrip("/") + "/"):
                    targets.append(mp)
    for t in targets:
        flags = os.statvfs(t).f_flag & abi.MS_KEEP  # keep locked flags (nodev, noexec, atime) as they are
        flags |= abi.MS_REMOUNT | abi.MS_BIND | abi.MS_NOSUID | (0 if dev else abi.MS_RDONLY | abi.MS_NODEV)
        try:
            libc.mount(None, t, None, flags)
        except OSError:
            if t == dst:
                raise


def _private_root(cfg: dict, libc: abi.Libc, pid_ns: bool, reason: dict) -> str:
    """Build the new root on a tmpfs at cfg['root'] and pivot into it; return the work dir."""
    with open(os.path.join(cfg["workdir"], cfg["program_name"]), "rb") as fh:
        program = fh.read()
    libc.mount(None, "/", None, abi.MS_REC | abi.MS_PRIVATE)  # nothing we mount reaches the host
    new = cfg["root"]
    libc.mount("tmpfs", new, "tmpfs", abi.MS_NOSUID | abi.MS_NODEV, "size=1m,mode=0755")
    try:
        size = f"size={cfg['tmpfs_mb']}m"
        # the private /tmp first: the interpreter or its venv may live under /tmp (a CI clone in
        # `mktemp -d`), and its read-only binds must land inside this tmpfs, not under it
        os.makedirs(new + "/tmp")
        libc.mount("tmpfs", new + "/tmp", "tmpfs", abi.MS_NOSUID | abi.MS_NODEV, f"{size},mode=1777")
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
        libc.mount(
            "tmpfs",
            new + "/dev/shm",
            "tmpfs",
            abi.MS_NOSUID | abi.MS_NODEV | abi.MS_NOEXEC,
            f"{size},mode=1777",
        )
        work = "/tmp/" + os.path.basename(cfg["workdir"].rstrip("/"))
        os.makedirs(new + work)
        with open(f"{new}{work}/{cfg['program_name']}", "wb") as fh:
            fh.write(program)
        os.chown(new + work, NOBODY, NOBODY)
        os.makedirs(new + "/proc")
        if pid_ns:
            try:
                libc.mount("proc", new + "/proc", "proc", abi.MS_NOSUID | abi.MS_NODEV | abi.MS_NOEXEC)
            except OSError as e:
                reason["proc"] = f"mounting a fresh /proc: {e}"
        else:
            reason["proc"] = "no PID namespace: /proc is left out (it would show the host's processes)"
        libc.mount(
            None,
            new,
            None,
            abi.MS_REMOUNT | abi.MS_RDONLY | abi.MS_NOSUID | abi.MS_NODEV,
            "size=1m,mode=0755",
        )
        os.chdir(new)
        try:
            libc.pivot_root(".", ".")
            libc.umount2(".", abi.MNT_DETACH)  # the old root is gone from this namespace
        except OSError:
            libc.mount(new, "/", None, 8192)  # MS_MOVE, then chroot (the program has no CAP_SYS_CHROOT)
            os.chroot(".")
        os.chdir("/")
    except BaseException:
        try:
            os.chdir("/")
            libc.umount2(new, abi.MNT_DETACH)
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
                    libc.prctl(abi.PR_CAPBSET_DROP, cap)
                except OSError:
                    pass
        os.setresuid(NOBODY, NOBODY, NOBODY)
    if libc is not None:
        libc.prctl(abi.PR_SET_NO_NEW_PRIVS, 1)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
    _status(cfg, identity={"uid": os.getuid(), "gid": os.getgid(), "no_new_privs": libc is not None})
    python = cfg["python"]
    os.execve(python, [python, "-I", *cfg["args"], os.path.join(workdir, cfg["program_name"])], env)


if __name__ == "__main__":
    _helper_main(json.loads(sys.argv[1]))
